"""Approvals: ``ask`` rules answered by a person, an automated reviewer or a timeout.

The checkpoint reaches this package only through :class:`proxy.core.checkpoint.Approver`
(:class:`proxy.approvals.broker.Broker`). Plain values live in :mod:`.model`; the state shared by
replicas behind :class:`proxy.approvals.store.Store` (SQLite in :mod:`.sqlite`, Redis in :mod:`.redis`);
persisted grants in :mod:`.overlay`; the people and programs who answer in :mod:`.admin` (HTTP API),
:mod:`.webhook` and :mod:`.reviewer`.
"""
