// Package logsetup builds the one logger every blktap process uses (the
// daemon, the tools and each disk's worker), so that a worker started from
// its own small binary logs exactly as one started from blktap would.
//
// The environment carries the choice from the daemon to its workers:
// BLKTAP_LOG_FORMAT=json for JSON (text otherwise), BLKTAP_LOG_LEVEL for
// the level (info by default, debug with BLKTAP_DEBUG). When standard
// error is journald's stream, each line starts with its syslog priority
// and carries no time (journald adds its own).
package logsetup

import (
	"io"
	"log/slog"
	"os"
)

// New returns the logger for standard error described in the package doc.
func New() *slog.Logger {
	level := slog.LevelInfo
	if os.Getenv("BLKTAP_DEBUG") != "" {
		level = slog.LevelDebug
	}
	if l := os.Getenv("BLKTAP_LOG_LEVEL"); l != "" {
		level.UnmarshalText([]byte(l)) // --log-level checked it; a bad inherited one keeps the default
	}
	opts := &slog.HandlerOptions{Level: level}
	newHandler := func(w io.Writer) slog.Handler {
		if os.Getenv("BLKTAP_LOG_FORMAT") == "json" {
			return slog.NewJSONHandler(w, opts)
		}
		return slog.NewTextHandler(w, opts)
	}
	if stderrIsJournal() {
		opts.ReplaceAttr = func(groups []string, a slog.Attr) slog.Attr {
			if len(groups) == 0 && a.Key == slog.TimeKey {
				return slog.Attr{}
			}
			return a
		}
		return slog.New(newJournalHandler(os.Stderr, newHandler))
	}
	return slog.New(newHandler(os.Stderr))
}
