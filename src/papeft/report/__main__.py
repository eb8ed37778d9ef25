"""`python -m papeft.report <runs-dir>`: median tables (md, csv, tex) from finished runs."""
from papeft.report.tables import main

raise SystemExit(main())
