package reconciler

import (
	"fmt"
	"time"
)

// checkRestartWait compares the delay device k's last worker restart
// waited, as Plan decided it (restart-worker's Action.Wait), with want.
func (r *daemonRun) checkRestartWait(k Key, want string) error {
	wd, err := time.ParseDuration(want)
	if err != nil {
		return fmt.Errorf("restart-wait %q: %v", want, err)
	}
	rs, _ := r.h.records(k, 0)
	var got *Action
	for _, rec := range rs {
		if rec.act != nil && rec.act.Kind == ActRestartWorker && rec.err == nil {
			got = rec.act
		}
	}
	switch {
	case got == nil:
		fmt.Fprintf(&r.out, "! %s restart-wait: no worker restarted\n", k)
	case time.Duration(got.Wait) != wd:
		fmt.Fprintf(&r.out, "! %s restart-wait = %v\n", k, time.Duration(got.Wait))
	}
	return nil
}

// serve lets the device's worker serve for a while: the test sleeps.
func (r *daemonRun) serve(arg string) error {
	d, err := time.ParseDuration(arg)
	if err != nil {
		return err
	}
	r.flush()
	time.Sleep(d)
	return nil
}
