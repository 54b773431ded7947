import sys

from moejax.train.loop import main

sys.exit(main())
