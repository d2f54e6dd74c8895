package xenstore

import (
	"context"
	"fmt"
	"strconv"
	"sync/atomic"
	"testing"
)

// BenchmarkServers measures request throughput of our embedded server,
// Xen's C xenstored and oxenstored through the same Go client, in one run:
//
//	go test -run '^$' -bench Servers ./xenstore
//
// "seq" is one request at a time (latency bound), "parallel" keeps
// GOMAXPROCS goroutines busy on one multiplexed client, "tx" is a
// read-modify-write transaction (4 round trips).
func BenchmarkServers(b *testing.B) {
	ours, _ := startServer(b)
	targets := []struct{ name, sock string }{
		{"ours", ours},
		{"c", startRealXenstored(b, "c")},
		{"ocaml", startRealXenstored(b, "ocaml")},
	}
	for _, tg := range targets {
		c := dial(b, tg.sock)
		ctx := context.Background()
		if err := c.Write(ctx, "/bench/v", "x"); err != nil {
			b.Fatal(err)
		}
		b.Run(tg.name+"/seq-write-read", func(b *testing.B) {
			for i := 0; b.Loop(); i++ {
				p := fmt.Sprintf("/bench/s/%d", i%64)
				if err := c.Write(ctx, p, "v"); err != nil {
					b.Fatal(err)
				}
				if _, err := c.Read(ctx, p); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(2*float64(b.N)/b.Elapsed().Seconds(), "ops/s")
		})
		b.Run(tg.name+"/parallel-read", func(b *testing.B) {
			b.SetParallelism(4)
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if _, err := c.Read(ctx, "/bench/v"); err != nil {
						b.Fatal(err)
					}
				}
			})
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "ops/s")
		})
		var n atomic.Int64
		b.Run(tg.name+"/tx", func(b *testing.B) {
			for b.Loop() {
				err := c.Transaction(ctx, func(tx *Tx) error {
					if _, err := tx.Read(ctx, "/bench/v"); err != nil {
						return err
					}
					return tx.Write(ctx, "/bench/v", fmt.Sprint(n.Add(1)))
				})
				if err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "tx/s")
		})
	}
}

// BenchmarkHandle measures State.Handle alone, without sockets: what a
// request costs the embedded daemon's single goroutine. "write-read" is
// a guest writing then reading a node under its home, "watched-write"
// also fires a dom0 watch, "tx" is start, read, write, commit.
//
//	go test -run '^$' -bench Handle ./xenstore
func BenchmarkHandle(b *testing.B) {
	setup := func() *State {
		st := NewState()
		st.AddConn(1, 0)
		st.AddConn(2, 5)
		st.Handle(1, Message{Type: OpMkdir, Payload: joinStrings("/local/domain/5")})
		st.Handle(1, Message{Type: OpSetPerms, Payload: joinStrings("/local/domain/5", "b5")})
		return st
	}
	keys := make([][]byte, 64)
	for i := range keys {
		keys[i] = joinStrings(fmt.Sprintf("data/k%d", i))
	}
	b.Run("write-read", func(b *testing.B) {
		st := setup()
		for i := 0; b.Loop(); i++ {
			k := keys[i%len(keys)]
			st.Handle(2, Message{Type: OpWrite, Payload: append(k, 'v')})
			if out := st.Handle(2, Message{Type: OpRead, Payload: k}); out[0].Msg.Type != OpRead {
				b.Fatal(out[0].Msg)
			}
		}
	})
	b.Run("watched-write", func(b *testing.B) {
		st := setup()
		st.Handle(1, Message{Type: OpWatch, Payload: joinStrings("/local/domain/5/data", "t")})
		for i := 0; b.Loop(); i++ {
			if out := st.Handle(2, Message{Type: OpWrite, Payload: append(keys[i%len(keys)], 'v')}); len(out) != 2 {
				b.Fatal(out)
			}
		}
	})
	b.Run("tx", func(b *testing.B) {
		st := setup()
		for b.Loop() {
			out := st.Handle(2, Message{Type: OpTransactionStart, Payload: joinStrings("")})
			id, _ := strconv.ParseUint(string(out[0].Msg.Payload[:len(out[0].Msg.Payload)-1]), 10, 32)
			tx := uint32(id)
			st.Handle(2, Message{Type: OpRead, TxID: tx, Payload: keys[0]})
			st.Handle(2, Message{Type: OpWrite, TxID: tx, Payload: append(keys[0], 'v')})
			if out := st.Handle(2, Message{Type: OpTransactionEnd, TxID: tx, Payload: joinStrings("T")}); out[0].Msg.Type != OpTransactionEnd {
				b.Fatal(out[0].Msg)
			}
		}
	})
}
