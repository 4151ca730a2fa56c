import sys

from .errors import EXIT_INTERRUPTED

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while importing: stop quietly, as main() does
    print("relay: stopped", file=sys.stderr)
    sys.exit(EXIT_INTERRUPTED)

sys.exit(main())
