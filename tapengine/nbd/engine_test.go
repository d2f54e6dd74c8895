package nbd

import (
	"bufio"
	"net"
	"testing"
)

// TestEngineChoice: the engine is what decides how a request runs, so a
// connection must get the async one exactly when its backend can start
// requests and the export asks for it (RoundTrip); a RoundTrip backend
// without AsyncBackend, or an AsyncBackend without RoundTrip, is served
// the synchronous way.
func TestEngineChoice(t *testing.T) {
	cases := []struct {
		name      string
		be        Backend
		roundTrip bool
		async     bool
	}{
		{"plain", newMem(1 << 20), false, false},
		{"plain round trip", newMem(1 << 20), true, false},
		{"starter without round trip", newStarter(1<<20, 4096, -1), false, false},
		{"starter round trip", newStarter(1<<20, 4096, -1), true, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			a, b := net.Pipe()
			defer a.Close()
			defer b.Close()
			s := &Server{Export: Export{Backend: tc.be, RoundTrip: tc.roundTrip}}
			c := newConn(s, a, bufio.NewReader(a), &session{})
			_, isAsync := c.eng.(asyncEngine)
			_, isSync := c.eng.(syncEngine)
			if isAsync != tc.async || isSync == tc.async {
				t.Fatalf("engine %T, want async=%v", c.eng, tc.async)
			}
		})
	}
}
