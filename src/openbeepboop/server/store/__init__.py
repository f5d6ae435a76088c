"""Storage backends behind one contract (`store.base.Store`)."""
