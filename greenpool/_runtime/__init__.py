"""The scheduling runtime: where greenpool's work runs and how its callers wait.

`monkey.patch_all()` may run before or after greenpool, psycopg or peewee
are imported, and one pool may serve greenlets and plain OS threads. So
nothing here binds to a patched or unpatched module at import: each decision
looks at the calling thread when it is made.

- `patching`: the unpatched originals of what gevent patches (no gevent import).
- `hub`: real locks and thread ids, "does this caller run on a gevent hub?", sleeping.
- `executor`: background jobs, as greenlets of the right hub or as OS threads.
- `waiters`: a parked request for a connection, for a greenlet or a thread.
- `timer`: one deadline timer per hub for all of a pool's parked greenlets.
"""
