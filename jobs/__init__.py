"""Each job kind's rules in one module (its spec, its checks, its creation), and the lifecycle every kind shares.

Imported by `api/` and `worker/`; imports neither. Functions here never commit: the caller's transaction
(the API request's session, a worker stage's) commits, and dispatch happens after that commit.
"""
