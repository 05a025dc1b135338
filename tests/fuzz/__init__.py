"""The fuzz harness: hostile and corrupt inputs for every reader, each run in a sandboxed child.

``python -m tests.fuzz --n N`` (``make fuzz N=...``) runs a campaign; ``tests/test_fuzz.py``
runs a short one in the default test run; ``tests/test_fuzz_harness.py`` proves each detector
fires on planted faults. Modules:

- :mod:`~tests.fuzz.seeds`: valid inputs made by the real tools (torch.save, save_file,
  GGUFWriter, prebake convert and pack);
- :mod:`~tests.fuzz.mutators`: mutations per format (bytes, zip headers, pickle opcodes,
  safetensors headers, GGUF fields, archives, manifests and symlinks);
- :mod:`~tests.fuzz.readers`: what each reader's inputs are, what the child runs, the check;
- :mod:`~tests.fuzz.targets` and :mod:`~tests.fuzz.reference`: prebake's side, the reference's;
- :mod:`~tests.fuzz.sandbox` and :mod:`~tests.fuzz.runner`: forked children with limits and an
  audit of every path they touch;
- :mod:`~tests.fuzz.classify`: the outcome classes and which are defects;
- :mod:`~tests.fuzz.campaign`, :mod:`~tests.fuzz.minimize`, :mod:`~tests.fuzz.table`: running,
  shrinking and reporting.
"""
