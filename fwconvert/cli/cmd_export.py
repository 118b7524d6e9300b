"""(commands registered by this module)"""
COMMANDS = []
