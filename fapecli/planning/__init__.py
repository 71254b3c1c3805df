"""Planning: read label-free statistics of an image and decide what to restore."""
