package xenstore

import (
	"context"
	"fmt"
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
