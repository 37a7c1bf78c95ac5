"""`loraforge tune`: hyperparameter search by the task's own metric (search.py: Optuna study, priors,
pruning; report.py: the table and HTML page of trials). Sits after eval: nothing but the CLI imports it."""
