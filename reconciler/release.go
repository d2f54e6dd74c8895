package reconciler

import (
	"context"

	"github.com/blktap-go/blktap/xenstore"
)

// watchReleaseDomain requeues the devices of every domain that died. A
// guest that dies without its toolstack cleaning up (or whose disk only
// `blktap attach` declared) leaves its backend at Connected; Plan counts
// its vanished frontend as Closed, which unmaps the ring's grants so Xen
// can free the domain instead of keeping it as a zombie. xenstored fires
// @releaseDomain without saying which domain, so each device's domain
// is checked.
func (d *Daemon) watchReleaseDomain(ctx context.Context) {
	w, err := d.xs.Watch(ctx, xenstore.WatchReleaseDomain, "release-domain")
	if err != nil {
		// The periodic resync still notices, only later.
		d.log.Warn("not watching @releaseDomain", "err", err)
		return
	}
	go func() {
		defer w.Close()
		for {
			select {
			case <-ctx.Done():
				return
			case _, ok := <-w.Events():
				if !ok {
					return
				}
				d.requeueReleased(ctx)
			}
		}
	}()
}

// requeueReleased queues every device whose domain's home
// (/local/domain/N) is gone.
func (d *Daemon) requeueReleased(ctx context.Context) {
	byDomain := map[uint32][]Key{}
	d.mu.Lock()
	for k := range d.devices {
		byDomain[k.Domid] = append(byDomain[k.Domid], k)
	}
	d.mu.Unlock()
	for domid, keys := range byDomain {
		if domid == d.self {
			continue
		}
		ok, err := d.xs.Exists(ctx, xenstore.DomainPath(domid))
		if err != nil || ok {
			continue
		}
		for _, k := range keys {
			d.q.Add(k)
		}
	}
}
