"""The dialect-neutral core: turn requests and outputs, conversations, turns, models, access."""
