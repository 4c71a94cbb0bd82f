"""Port-I/O devices, one small module each: a state dataclass, read/write, save/restore."""
