"""droid itself: its JSON-RPC protocol, one worker process, how it is launched, its files."""
