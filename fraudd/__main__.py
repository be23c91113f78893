from fraudd.cli import main

main()
