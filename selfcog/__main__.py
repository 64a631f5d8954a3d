from selfcog.cli import main

main()
