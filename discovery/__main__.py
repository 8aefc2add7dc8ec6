from discovery.cli import main

main()
