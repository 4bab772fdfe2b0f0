"""The round-trip selfcheck: build a probe, send it by SMTP, find it over IMAP, verify, delete."""
