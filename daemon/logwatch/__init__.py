"""The leak watcher: mail log sources, the sendmail/Postfix parser, the sinkhole leak detector."""
