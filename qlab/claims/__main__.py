import sys

from qlab.claims.verdicts import main

sys.exit(main())
