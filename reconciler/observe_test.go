package reconciler

import (
	"context"
	"net"
	"path/filepath"
	"strconv"
	"sync"
	"testing"

	"github.com/blktap-go/blktap/xenstore"
)

// countingConn records every request the daemon's client sends, so a test
// can tell how many round trips one observation costs and whether they ran
// in one transaction.
type countingConn struct {
	net.Conn
	mu   sync.Mutex
	dec  xenstore.Decoder
	sent []xenstore.Message
}

func (c *countingConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	c.dec.Feed(p)
	for {
		m, ok, err := c.dec.Next()
		if err != nil || !ok {
			break
		}
		c.sent = append(c.sent, m)
	}
	c.mu.Unlock()
	return c.Conn.Write(p)
}

func (c *countingConn) take() []xenstore.Message {
	c.mu.Lock()
	defer c.mu.Unlock()
	m := c.sent
	c.sent = nil
	return m
}

// countingDaemon is bareDaemon with its xenstore client's requests counted.
func countingDaemon(t *testing.T) (*Daemon, *countingConn) {
	t.Helper()
	d, _, dir := bareDaemon(t)
	cc := &countingConn{}
	xs, err := xenstore.Dial(context.Background(), "", xenstore.WithDialer(func(ctx context.Context) (net.Conn, error) {
		var nd net.Dialer
		conn, err := nd.DialContext(ctx, "unix", filepath.Join(dir, "xs.sock"))
		cc.Conn = conn
		return cc, err
	}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { xs.Close() })
	d.xs = xs
	return d, cc
}

// One observation of a device is one consistent view: every read it makes
// belongs to one transaction, so no toolstack write can fall between two
// of them. The test also bounds how many requests that takes, for a
// domain-0 disk as it converges and once it is connected.
func TestObserveOneTransaction(t *testing.T) {
	d, cc := countingDaemon(t)
	d.localFrontend = true
	ctx := context.Background()
	k := Key{KindVBD3, 0, 51712}
	be := d.backendPath(k)
	fe := k.FrontendPath()
	write := func(kv ...string) {
		t.Helper()
		for i := 0; i < len(kv); i += 2 {
			if err := d.xs.Write(ctx, kv[i], kv[i+1]); err != nil {
				t.Fatal(err)
			}
		}
	}
	// As `blktap attach 0` declares the disk.
	write(be+"/params", "aio:/img/a.raw", be+"/mode", "w", be+"/online", "1",
		be+"/state", "1", be+"/frontend", fe, be+"/frontend-id", "0", be+"/"+keySource, "attach",
		fe+"/state", "1", fe+"/backend", be)
	dev := d.newDevice(k)
	dev.feWatch = &xenstore.Watch{} // no frontend watch: it would count its own request
	dev.fePath = fe
	total := 0
	observe := func(stage string) snapshot {
		t.Helper()
		cc.take()
		s, err := d.observe(ctx, dev)
		if err != nil {
			t.Fatal(err)
		}
		sent := cc.take()
		total += len(sent)
		var outside []string
		starts := 0
		for _, m := range sent {
			switch {
			case m.Type == xenstore.OpTransactionStart:
				starts++
			case m.Type != xenstore.OpTransactionEnd && m.TxID == 0:
				outside = append(outside, m.Type.String())
			}
		}
		if starts != 1 || len(outside) > 0 {
			t.Errorf("%s: %d transactions, %v outside one", stage, starts, outside)
		}
		t.Logf("%s: %d requests", stage, len(sent))
		return s
	}
	s := observe("declared")
	if !s.Present || !s.Domain0 || s.Params != "aio:/img/a.raw" || s.Backend != StateInitialising {
		t.Fatalf("declared: observed %+v", s.Observed)
	}
	// What the daemon writes on its way to Connected (start-worker,
	// serve-export, backend-initwait, dom0-connect), one round each.
	write(be+"/physical-device-path", "/run/blktap/a.sock")
	observe("worker started")
	write(be+"/feature-flush-cache", "1", be+"/multi-queue-max-queues", "1", be+"/state", "2")
	observe("initwait")
	write(be+"/hotplug-status", "connected", be+"/sectors", "2048", be+"/info", "0",
		be+"/sector-size", "512", be+"/state", strconv.Itoa(int(StateConnected)), fe+"/state", "4")
	s = observe("connected")
	if s.Backend != StateConnected || s.Frontend != StateConnected || !s.HotplugConnected {
		t.Fatalf("connected: observed %+v", s.Observed)
	}
	t.Logf("total over four observations: %d requests", total)
	if total > 4*maxObserveRequests {
		t.Errorf("%d requests for four observations, want at most %d", total, 4*maxObserveRequests)
	}
}

// maxObserveRequests bounds one observation of a domain-0 disk: the
// transaction's start and end, the two directory listings and the keys
// that are there.
const maxObserveRequests = 24
