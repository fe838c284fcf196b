from ctxcache.cli import main

# Guarded: `warm --jobs` starts workers with multiprocessing's spawn, which re-imports the parent's
# main module in each worker.
if __name__ == "__main__":
    raise SystemExit(main())
