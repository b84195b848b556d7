"""The HTTP front end: the aiohttp app, one turn handler, and one module per wire dialect."""
