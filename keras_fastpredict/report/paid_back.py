"""Whether each model's one-time work (callables made, graphs built: ``stats()``'s
``one_time_ms``) has paid for itself yet.

Measured on the usual calls only, on both sides: a site's calls after its sample, of the
row count plain Keras was timed for, against plain Keras' own warmed-up time for those
rows. A site's first call (its callable made) is never a usual call, and plain Keras'
first-call work (its session, its first run) is not in its warmed-up figure either, so
neither side's first calls tip the balance; the sample's calls (a site's first 128 at
most) count as saving nothing. Work done later, inside a usual call (the inference graph,
built at the top of the call that finds it due, and its checks; a second callable), is in
that call's time as well as in the work: counted twice. Both can only make the answer
later, never early. The one-time work itself is what the engine timed when it did it.
It is done for a model (its counters: a site's ``path``, which for ``K.function`` and
``Session.run`` signatures served through a model are the model's, not the signature's).
Calls deferred outside auto-batch (``defer=True``, ``batching()``, ``@fast_predict``) run
later, at a read, untimed: their own time is not their cost, so nothing is said of them.
"""
import collections


def untimed(site):
    """Why the runs of a site's usual calls are not all in their time (None: they are)."""
    auto = site.auto
    if site.deferred > (auto.calls if auto is not None else 0):
        return 'deferred calls ran untimed'     # by a scope: at a read, not timed
    if auto is not None and auto.open > 0:
        return 'auto-batched calls not run yet'
    return None


def usual(site):
    """A site's usual calls and their mean time (seconds, with deferred calls' runs), or
    (calls, None) where it has none or their runs were not timed."""
    calls = site.hot
    if not calls:
        return 0, None
    if untimed(site) is not None:
        return calls, None
    spent = site.time_s - site.other_s
    if site.auto is not None:
        spent += site.auto.outside_s    # deferred calls ran after the calls (usual ones)
    return calls, max(0.0, spent) / calls


def models(found):
    """Per model (its counters) that did one-time work: that work, what its sites' usual
    calls saved so far, and whether that is as much (None: not known yet, and why)."""
    by_stats = collections.OrderedDict()
    for site in found:
        model = site.path or site.stats     # (the counters the one-time work is in)
        by_stats.setdefault(id(model), (model, []))[1].append(site)
    out = []
    for stats, its_sites in by_stats.values():
        one_time = dict(stats.one_time)
        if not one_time:
            continue
        cost = sum(one_time.values())
        saved, calls, unknown = 0.0, 0, []
        for site in its_sites:
            n, per_call = usual(site)
            if not n:
                continue
            if per_call is None:
                unknown.append('%s at %s' % (untimed(site), site.where()))
            elif not site.plain_per_call:
                unknown.append('plain Keras not timed at %s' % site.where())
            else:
                saved += n * (site.plain_per_call - per_call)
                calls += n
        if calls and not unknown:
            paid, note = saved >= cost, None
        else:
            # (a site left out could have cost more than plain Keras: no answer, rather
            # than an early one)
            paid = None
            note = ('; '.join(unknown[:3]) if unknown else
                    'no usual calls yet (each site samples its first calls)')
        out.append(collections.OrderedDict([
            ('model', stats.name),
            ('one_time_ms', {what: 1e3 * s for what, s in one_time.items()}),
            ('usual_calls', calls), ('saved_s', None if paid is None else saved),
            ('paid_back', paid), ('note', note)]))
    return out


def text(d):
    """One line of the table."""
    work = ', '.join('%s %.1f ms' % kv for kv in sorted(d['one_time_ms'].items()))
    total = sum(d['one_time_ms'].values())
    if d['paid_back'] is None:
        verdict = 'paid back: not known (%s)' % d['note']
    else:
        verdict = '%.1f ms saved by %d usual calls (%.1f us each) against plain Keras: %s' % (
            1e3 * d['saved_s'], d['usual_calls'], 1e6 * d['saved_s'] / d['usual_calls'],
            'paid back' if d['paid_back'] else 'not paid back yet')
    return '  one-time work for %s: %.1f ms (%s); %s' % (d['model'], total, work, verdict)
