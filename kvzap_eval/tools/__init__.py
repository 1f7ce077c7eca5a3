"""Command-line tools over everything below: `demo`, `bench`, `latency` (scorer backends side by side) and `gate`
(the CI regression gate). May import every other wing.
"""
