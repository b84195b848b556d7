"""The durable session store."""
