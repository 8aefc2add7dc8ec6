from discovery.cli.main import main

main()
