"""Helpers shared by several test modules (image makers, training fixtures, a loopback weights server). Test modules
import from here, never from each other."""
