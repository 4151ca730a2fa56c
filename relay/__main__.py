import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while importing: stop quietly, as main() does
    print("relay: stopped", file=sys.stderr)
    sys.exit(0)

sys.exit(main())
