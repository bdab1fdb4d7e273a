"""reup's delta encoder: streams that take a device from what it holds to a target closure."""
