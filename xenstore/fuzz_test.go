package xenstore

import (
	"testing"

	"github.com/blktap-go/blktap/internal/corpus"
)

// FuzzState feeds arbitrary packets to the server's reply function, from
// three connections (req_id mod 3 picks dom0, dom0 or domain 5). Nothing
// may panic, every request gets exactly one reply (first, to its sender,
// echoing its ids), every message encodes within PayloadMax, and the
// tree's invariants hold after each request.
func FuzzState(f *testing.F) {
	for _, b := range append(corpus.Files(f, "sequences/*.bin"), corpus.Files(f, "wire/*.bin")...) {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		st := NewState()
		st.AddConn(1, 0)
		st.AddConn(2, 0)
		st.AddConn(3, 5)
		var d Decoder
		d.Feed(in)
		for n := 0; n < 200; n++ {
			m, ok, err := d.Next()
			if err != nil || !ok {
				return
			}
			from := ConnID(m.ReqID%3 + 1)
			outs := st.Handle(from, m)
			if len(outs) == 0 || outs[0].Conn != from || outs[0].Msg.ReqID != m.ReqID || outs[0].Msg.TxID != m.TxID {
				t.Fatalf("request %v: first outgoing %v", m, outs)
			}
			if r := outs[0].Msg.Type; r != m.Type && r != OpError {
				t.Fatalf("request %v answered with %s", m, r)
			}
			for i, o := range outs {
				if _, err := o.Msg.Append(nil); err != nil {
					t.Fatalf("outgoing %d does not encode: %v", i, err)
				}
				if i > 0 && o.Msg.Type != OpWatchEvent {
					t.Fatalf("second message is %s, not a watch event", o.Msg.Type)
				}
			}
			if err := st.Check(); err != nil {
				t.Fatal(err)
			}
		}
	})
}
