"""Use-cases shared by the HTTP layer and the worker; no litestar or arq here."""
