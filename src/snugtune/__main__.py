from snugtune.cli import main

main()
