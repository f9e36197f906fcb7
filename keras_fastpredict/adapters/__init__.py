"""Adapters: one per API served. Each says where its entry points are and how a call's
feeds, session and validation are found, then hands the call to the engine."""
