from brickyard.cli import main

main()
