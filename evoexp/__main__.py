from evoexp.cli import main

main()
