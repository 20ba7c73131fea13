"""Many decoders per feature stream: one job (``deeploc-train heads=[...]``) trains several heads on the same
batches, each exactly as its own run (docs/multihead.md): ``heads`` composes them, ``module`` trains them, ``callbacks``
keeps each head's checkpoints and books, ``job`` runs it all and writes each head's run directory."""
