from tlrefusal.cli import main

main()
