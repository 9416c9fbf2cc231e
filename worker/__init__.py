"""The arq worker: starts turns' runs, follows them, reconciles the queue with Postgres."""
