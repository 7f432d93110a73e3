def preload(parser):
    parser.add_argument("--d3sr-models-path", type=str, default=None, help="Folder of D3SR one-step SR models (default: models/D3SR).")
