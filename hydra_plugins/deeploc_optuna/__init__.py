"""deeploc's Optuna sweeper for Hydra (``hparams_search=optuna``): a persistent, resumable search on Optuna's own API."""
