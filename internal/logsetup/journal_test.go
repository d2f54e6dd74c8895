package logsetup

import (
	"bytes"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

// Under journald each line carries its syslog priority, so that
// `journalctl -p err` finds the errors.
func TestJournalPriorities(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(newJournalHandler(&buf, func(w io.Writer) slog.Handler {
		return slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug})
	})).With("disk", "a")
	log.Debug("d")
	log.Info("i")
	log.Warn("w")
	log.Error("e", "err", "boom")
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	want := []string{"<7>", "<6>", "<4>", "<3>"}
	if len(lines) != len(want) {
		t.Fatalf("got %d lines:\n%s", len(lines), buf.String())
	}
	for i, l := range lines {
		if !strings.HasPrefix(l, want[i]+"time=") || !strings.Contains(l, "disk=a") {
			t.Errorf("line %d = %q, want prefix %s and the attrs", i, l, want[i])
		}
	}
}

// JOURNAL_STREAM counts only when it names the file stderr is.
func TestStderrIsJournal(t *testing.T) {
	if os.Getenv("BLKTAP_TEST_JOURNAL_CHILD") != "" {
		if stderrIsJournal() {
			os.Stdout.WriteString("journal")
		} else {
			os.Stdout.WriteString("not")
		}
		os.Exit(0)
	}
	f, err := os.Create(filepath.Join(t.TempDir(), "stream"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var st syscall.Stat_t
	if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	match := "JOURNAL_STREAM=" + strconv.FormatUint(uint64(st.Dev), 10) + ":" + strconv.FormatUint(st.Ino, 10)
	for _, c := range []struct {
		env  string
		want string
	}{
		{match, "journal"},
		{"JOURNAL_STREAM=1:2", "not"},
		{"JOURNAL_STREAM=", "not"},
	} {
		cmd := exec.Command(os.Args[0], "-test.run", "^TestStderrIsJournal$")
		cmd.Env = append(os.Environ(), "BLKTAP_TEST_JOURNAL_CHILD=1", c.env)
		cmd.Stderr = f
		out, err := cmd.Output()
		if err != nil {
			t.Fatal(err)
		}
		if string(out) != c.want {
			t.Errorf("%s: %q, want %q", c.env, out, c.want)
		}
	}
}
