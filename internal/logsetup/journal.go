package logsetup

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"
	"syscall"
)

// stderrIsJournal reports whether standard error is the journald stream
// systemd connected it to: $JOURNAL_STREAM ("DEV:INODE") names the stream,
// and it must be the file standard error still is (a redirection by
// a shell script in between would not be).
func stderrIsJournal() bool {
	var dev, ino uint64
	if _, err := fmt.Sscanf(os.Getenv("JOURNAL_STREAM"), "%d:%d", &dev, &ino); err != nil {
		return false
	}
	var st syscall.Stat_t
	if err := syscall.Fstat(2, &st); err != nil {
		return false
	}
	return uint64(st.Dev) == dev && st.Ino == ino
}

// syslogPriority is the sd-daemon(3) prefix for a level: "<3>" err, "<4>"
// warning, "<6>" info, "<7>" debug. journald strips it and files the line
// under that priority (`journalctl -p err`).
func syslogPriority(l slog.Level) string {
	switch {
	case l >= slog.LevelError:
		return "<3>"
	case l >= slog.LevelWarn:
		return "<4>"
	case l >= slog.LevelInfo:
		return "<6>"
	default:
		return "<7>"
	}
}

// prioWriter prefixes each write (one log record: slog's text and JSON
// handlers write each record with one Write) with the priority its
// handler set just before.
type prioWriter struct {
	mu   sync.Mutex // held across set-priority and the record's Write
	w    io.Writer
	prio string
}

func (pw *prioWriter) Write(b []byte) (int, error) {
	line := make([]byte, 0, len(pw.prio)+len(b))
	line = append(append(line, pw.prio...), b...)
	if _, err := pw.w.Write(line); err != nil {
		return 0, err
	}
	return len(b), nil
}

// prioHandler wraps a handler writing to a prioWriter so that every line
// carries its record's syslog priority.
type prioHandler struct {
	inner slog.Handler
	pw    *prioWriter
}

// newJournalHandler makes a handler of kind newInner writing to w with
// priority prefixes.
func newJournalHandler(w io.Writer, newInner func(io.Writer) slog.Handler) slog.Handler {
	pw := &prioWriter{w: w}
	return &prioHandler{inner: newInner(pw), pw: pw}
}

func (h *prioHandler) Enabled(ctx context.Context, l slog.Level) bool {
	return h.inner.Enabled(ctx, l)
}

func (h *prioHandler) Handle(ctx context.Context, r slog.Record) error {
	h.pw.mu.Lock()
	defer h.pw.mu.Unlock()
	h.pw.prio = syslogPriority(r.Level)
	return h.inner.Handle(ctx, r)
}

func (h *prioHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return &prioHandler{inner: h.inner.WithAttrs(as), pw: h.pw}
}

func (h *prioHandler) WithGroup(name string) slog.Handler {
	return &prioHandler{inner: h.inner.WithGroup(name), pw: h.pw}
}
