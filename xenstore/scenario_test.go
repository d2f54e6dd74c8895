package xenstore

import (
	"bufio"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

var rewrite = flag.Bool("rewrite", false, "rewrite testdata/scenarios/*.txt with the replies the State gives")

// TestScenarios replays the transcripts in testdata/scenarios. Each is:
//
//	# comment
//	conn 1 dom 0                   a connection (id, domain)
//	1> WRITE "/a\x00v"             a request on connection 1 (tx=N optional)
//	1< WRITE "OK\x00"              every message the State sends, in order
//
// Payloads are Go-quoted. Run with -rewrite to regenerate the "<" lines
// after an intended behaviour change, then review the diff.
func TestScenarios(t *testing.T) {
	files, _ := filepath.Glob("testdata/scenarios/*.txt")
	if len(files) == 0 {
		t.Fatal("no scenarios")
	}
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) { runScenario(t, f) })
	}
}

var opByName = func() map[string]Op {
	m := map[string]Op{}
	for i, n := range opNames {
		m[n] = Op(i)
	}
	return m
}()

func runScenario(t *testing.T, file string) {
	data, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	st := NewState()
	var out []string // the rewritten file
	var want, got []string
	flush := func(line int) {
		if !*rewrite && strings.Join(got, "\n") != strings.Join(want, "\n") {
			t.Errorf("%s:%d:\n got: %s\nwant: %s", file, line, strings.Join(got, "\n      "), strings.Join(want, "\n      "))
		}
		if len(got) > 0 {
			out = append(out, got...)
		}
		want, got = nil, nil
	}
	sc := bufio.NewScanner(strings.NewReader(string(data)))
	sc.Buffer(make([]byte, 64*1024), 1<<20)
	n, req := 0, uint32(0)
	for sc.Scan() {
		n++
		line := sc.Text()
		f := strings.Fields(line)
		switch {
		case len(f) == 0 || strings.HasPrefix(line, "#"):
			flush(n)
			out = append(out, line)
		case f[0] == "conn" && len(f) == 4:
			flush(n)
			id, _ := strconv.ParseUint(f[1], 10, 64)
			dom, _ := strconv.ParseUint(f[3], 10, 32)
			st.AddConn(ConnID(id), uint32(dom))
			out = append(out, line)
		case strings.Contains(f[0], ">"):
			flush(n)
			out = append(out, line)
			conn, _ := strconv.ParseUint(strings.TrimSuffix(f[0], ">"), 10, 64)
			op, ok := opByName[f[1]]
			if !ok {
				if v, err := strconv.ParseUint(f[1], 10, 32); err == nil {
					op = Op(v)
				} else {
					t.Fatalf("%s:%d: unknown op %s", file, n, f[1])
				}
			}
			rest := strings.TrimSpace(strings.SplitN(line, f[1], 2)[1])
			var tx uint64
			if strings.HasPrefix(rest, "tx=") {
				sp := strings.SplitN(rest, " ", 2)
				tx, _ = strconv.ParseUint(sp[0][3:], 10, 32)
				rest = strings.TrimSpace(sp[1])
			}
			payload, err := strconv.Unquote(rest)
			if err != nil {
				t.Fatalf("%s:%d: payload: %v", file, n, err)
			}
			req++
			for _, o := range st.Handle(ConnID(conn), Message{Type: op, ReqID: req, TxID: uint32(tx), Payload: []byte(payload)}) {
				got = append(got, fmt.Sprintf("%d< %s %s", o.Conn, o.Msg.Type, strconv.Quote(string(o.Msg.Payload))))
			}
			if err := st.Check(); err != nil {
				t.Fatalf("%s:%d: %v", file, n, err)
			}
		case strings.Contains(f[0], "<"):
			want = append(want, line)
		default:
			t.Fatalf("%s:%d: cannot parse %q", file, n, line)
		}
	}
	flush(n)
	if *rewrite {
		if err := os.WriteFile(file, []byte(strings.Join(out, "\n")+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}
