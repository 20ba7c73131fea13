"""Many decoders per feature stream: one job trains several heads on the same batches (``heads=[...]``).

* :mod:`deeploc.multihead.heads`: each head composed by Hydra as the single run it stands for (config, run
  directory), and checked to share the job's settings;
* :mod:`deeploc.multihead.module`: :class:`MultiHeadModule`, one encoder pass (or one read of the cached maps) per
  batch feeding every head, each head trained exactly as in its own run;
* :mod:`deeploc.multihead.callbacks`: per-head checkpoints in the single-run format, best validation values, loggers,
  epoch lines;
* :mod:`deeploc.multihead.job`: the job (``deeploc-train heads=[...]``): skip finished heads, resume, fit, test,
  write each head's run directory.
"""
