"""One module per compression technique; each exposes a `TECHNIQUE` entry that compress.registry finds by name."""
