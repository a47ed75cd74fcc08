"""Infrastructure every part of ornis shares, each piece written once: atomic writes, file locks, progress bars,
distributed setup and collectives. Nothing here knows about models, weights or data."""
