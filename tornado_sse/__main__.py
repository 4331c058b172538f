from tornado_sse.cli import main

main()
